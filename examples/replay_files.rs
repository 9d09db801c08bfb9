//! Writes one large training log per `replay` format, for the replay
//! benchmark (`clients/python/benchmarks/replay_formats.py`):
//!
//! ```sh
//! cargo run --release --example replay_files -- OUT_DIR [STEPS] [HF_STEPS]
//! ```
//!
//! STEPS (default 1,000,000) steps of one healthy-looking run (loss, gradient
//! norm, learning rate; seeded noise) as `run.jsonl`, llm.c's `main.log`,
//! Megatron's `megatron.log`, TensorBoard's `tb/events.out.tfevents.*` (torch's
//! layout: one `simple_value` event per tag and step), Lightning's
//! `metrics.csv` (with a validation row every 100 steps), and HF_STEPS (default
//! 100,000) as `hf/trainer_state.json`.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use gradguard::trace::tensorboard::{Event, Summary, Value, masked_crc32c};
use prost::Message;

struct Step {
    step: u64,
    loss: f64,
    norm: f64,
    lr: f64,
}

fn steps(n: u64) -> impl Iterator<Item = Step> {
    let mut x: u64 = 42;
    (1..=n).map(move |step| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let noise = (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        Step {
            step,
            loss: 2.0 + 8.0 / (1.0 + step as f64 / 1000.0) + 0.05 * noise,
            norm: 1.0 + 0.2 * noise,
            lr: 3e-4 * (1.0 - step as f64 / (2 * n) as f64),
        }
    })
}

fn record(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc32c(data).to_le_bytes())
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: replay_files OUT_DIR [STEPS] [HF_STEPS]");
    let n: u64 = args.next().map_or(1_000_000, |s| s.parse().expect("STEPS"));
    let hf_n: u64 = args.next().map_or(100_000, |s| s.parse().expect("HF_STEPS"));
    let dir = Path::new(&dir);
    fs::create_dir_all(dir.join("tb"))?;
    fs::create_dir_all(dir.join("hf"))?;
    let create = |name: &str| File::create(dir.join(name)).map(|f| BufWriter::with_capacity(1 << 20, f));

    let mut out = create("run.jsonl")?;
    for s in steps(n) {
        writeln!(
            out,
            "{{\"step\": {}, \"loss\": {}, \"grad_norm\": {}, \"lr\": {}}}",
            s.step, s.loss, s.norm, s.lr
        )?;
    }
    out.flush()?;

    let mut out = create("main.log")?;
    for s in steps(n) {
        writeln!(out, "s:{} trl:{:.6} lr:{:.6e} norm:{:.4}", s.step, s.loss, s.lr, s.norm)?;
    }
    out.flush()?;

    let mut out = create("megatron.log")?;
    for s in steps(n) {
        writeln!(
            out,
            " [2024-05-01 10:00:00] iteration {:>8}/ {n:>8} | consumed samples: {:>12} | elapsed time per iteration (ms): 1234.5 | \
             learning rate: {:.6E} | global batch size:   512 | lm loss: {:.6E} | loss scale: 65536.0 | grad norm: {:.3} | \
             number of skipped iterations:   0 | number of nan iterations:   0 |",
            s.step,
            s.step * 512,
            s.lr,
            s.loss,
            s.norm
        )?;
    }
    out.flush()?;

    let mut out = create("tb/events.out.tfevents.1700000000.bench.1.0")?;
    let version = [
        0x1a, 0x0d, b'b', b'r', b'a', b'i', b'n', b'.', b'E', b'v', b'e', b'n', b't', b':', b'2',
    ];
    record(&mut out, &version)?;
    let mut buf = Vec::new();
    for s in steps(n) {
        for (tag, x) in [
            ("train/loss", s.loss),
            ("train/grad_norm", s.norm),
            ("train/learning_rate", s.lr),
        ] {
            let event = Event {
                wall_time: 1.7e9 + s.step as f64,
                step: s.step as i64,
                summary: Some(Summary {
                    value: vec![Value {
                        tag: tag.to_owned(),
                        simple_value: Some(x as f32),
                        tensor: None,
                    }],
                }),
            };
            buf.clear();
            event.encode(&mut buf).expect("a Vec grows");
            record(&mut out, &buf)?;
        }
    }
    out.flush()?;

    let mut out = create("metrics.csv")?;
    writeln!(out, "epoch,grad_2.0_norm_total,lr-AdamW,step,train_loss,val_loss")?;
    for s in steps(n) {
        let epoch = s.step / 10_000;
        writeln!(out, "{epoch},{},{},{},{},", s.norm, s.lr, s.step, s.loss)?;
        if s.step % 100 == 0 {
            writeln!(out, "{epoch},,,{},,{}", s.step, s.loss + 0.1)?;
        }
    }
    out.flush()?;

    let mut out = create("hf/trainer_state.json")?;
    writeln!(out, "{{\n  \"best_metric\": null,\n  \"log_history\": [")?;
    for s in steps(hf_n) {
        let comma = if s.step == hf_n { "" } else { "," };
        writeln!(
            out,
            "    {{\n      \"epoch\": {:.4},\n      \"grad_norm\": {},\n      \"learning_rate\": {},\n      \"loss\": {},\n      \"step\": {}\n    }}{comma}",
            s.step as f64 / hf_n as f64,
            s.norm,
            s.lr,
            s.loss,
            s.step
        )?;
    }
    writeln!(out, "  ],\n  \"max_steps\": {hf_n}\n}}")?;
    out.flush()
}
