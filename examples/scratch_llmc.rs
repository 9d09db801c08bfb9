use gradguard::engine::{Engine, Output};
use gradguard::model::Summary;
fn main() {
    let text = std::fs::read_to_string("../shared/traces/gpt2-124m-llmc.log").unwrap();
    let mut e = Engine::default();
    let mut out = Output::default();
    for l in text.lines() {
        let mut s = Summary::default();
        let mut ok = false;
        for f in l.split_whitespace() {
            let (k, v) = f.split_once(':').unwrap();
            match k {
                "s" => s.step = v.parse().unwrap(),
                "trl" => {
                    s.loss = Some(v.parse().unwrap());
                    ok = true
                }
                "lr" => s.lr = Some(v.parse().unwrap()),
                "norm" => s.grad_norm = Some(v.parse().unwrap()),
                _ => {}
            }
        }
        if ok {
            e.observe("llmc", &s, &mut out).unwrap();
        }
    }
    let mut counts = std::collections::BTreeMap::new();
    for f in &out.findings {
        *counts.entry((f.rule, f.severity)).or_insert(0) += 1;
        if f.severity > gradguard::model::Severity::Info
            || f.rule != gradguard::model::RuleId::GradSpike
            || f.value > 20.0
            || (8700..8720).contains(&f.step)
            || (12000..12010).contains(&f.step)
        {
            println!("F {} {} {} {}", f.step, f.rule, f.severity, f.message);
        }
    }
    let mut ac = std::collections::BTreeMap::new();
    for a in &out.advice {
        *ac.entry((a.action.name(), a.severity)).or_insert(0) += 1;
        if a.action.name() != "clip_gradients" {
            println!("A {} {} {} {}", a.step, a.action, a.severity, a.reason);
        }
    }
    println!("{counts:?}\n{ac:?}");
}
