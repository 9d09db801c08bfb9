//! What a good detector does on each input: healthy, or faulty from some steps.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Onset {
    pub step: u64,
    /// Steps after `step` within which the first alarm must come (0: at `step`).
    pub max_delay: u64,
    /// A short name for reports.
    pub name: &'static str,
    /// The last step the fault lasts (`u64::MAX`: it never recovers). Alarms
    /// from the onset to here are about the fault, not false.
    pub end: u64,
}

impl Onset {
    pub const fn new(step: u64, max_delay: u64, name: &'static str) -> Self {
        Self {
            step,
            max_delay,
            name,
            end: step.saturating_add(max_delay),
        }
    }

    /// The fault lasts until `end` (inclusive).
    pub const fn lasting(mut self, end: u64) -> Self {
        self.end = end;
        self
    }

    /// Whether an alarm at `step` catches the fault in time.
    pub fn in_time(&self, step: u64) -> bool {
        step >= self.step && step - self.step <= self.max_delay
    }

    /// Whether `step` lies within the fault, `[onset, end]`.
    pub fn covers(&self, step: u64) -> bool {
        step >= self.step && step <= self.end.max(self.step.saturating_add(self.max_delay))
    }
}

/// What a good detector does on an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    /// A healthy run. `no_warning`: the README expects nothing of warning or
    /// worse at all; otherwise only no severe event (and, the tests add, at
    /// most one warning-or-worse finding).
    Healthy { no_warning: bool },
    /// A run with faults, each of which must be caught in time.
    Faulty { onsets: Vec<Onset> },
}

impl Label {
    pub fn onsets(&self) -> &[Onset] {
        match self {
            Label::Healthy { .. } => &[],
            Label::Faulty { onsets } => onsets,
        }
    }

    pub(super) fn covers(&self, step: u64) -> bool {
        self.onsets().iter().any(|o| o.covers(step))
    }

    /// `-` when healthy, else `STEP+MAX_DELAY` per onset.
    pub(super) fn short(&self) -> String {
        match self {
            Label::Healthy { .. } => "-".to_owned(),
            Label::Faulty { onsets } => onsets
                .iter()
                .map(|o| format!("{}+{}", o.step, o.max_delay))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

pub(super) fn faulty(onsets: &[Onset]) -> Label {
    Label::Faulty {
        onsets: onsets.to_vec(),
    }
}

/// The real traces (paths relative to the traces directory) and what the
/// traces' README says a good detector does on each.
pub fn trace_labels() -> Vec<(&'static str, Label)> {
    let quiet = Label::Healthy { no_warning: true };
    vec![
        // llm.c GPT-2 124M main.log: isolated norm outliers; no severe, no warning.
        ("gpt2-124m-llmc.log", quiet.clone()),
        // The same model in llm.c's stdout format: grad-only spikes seen as info.
        ("llmc/gpt2-124m-stdout.log", quiet.clone()),
        // Loss and norm are nan from step 1: critical non-finite at step 1.
        (
            "llmc/gpt2-124m-stdout-nan.log",
            faulty(&[Onset::new(1, 0, "nan").lasting(u64::MAX)]),
        ),
        ("hf/pythia1b_tokalign_s2.json", quiet.clone()),
        ("hf/whisper_medium_bashkir.json", quiet.clone()),
        ("hf/mistral7b_translator_lora.json", quiet.clone()),
        // Grad norm logged as 0.0 on most rows: no severe, at most one finding
        // that the norm reads as zero.
        ("hf/chatglm3_6b_lora_gyneco.json", Label::Healthy { no_warning: false }),
        ("hf/deepseek_vl2_tiny_lora_coco.json", quiet.clone()),
        // Late small grad bursts: info spikes at most.
        ("hf/glm4_9b_lora_chatbot.json", quiet.clone()),
        // Grad-only spikes at 164000 and 190000: info there, nothing more.
        ("hf/t5_small_summarization.json", quiet.clone()),
        (
            "hf/llama3_8b_mob_qlora_restart_diverge.json",
            faulty(&[
                // Warm-up instability from the first steps: the norm jumps
                // from 0.07-0.19 to 20-60 by step 9-24 and the loss from 0.38
                // to 5.2 by step 50; spikes go on through the 500s (439: norm
                // 257, ~160x its level, the loss ~16% up for four steps).
                Onset::new(1, 60, "warm-up-instability").lasting(600),
                Onset::new(439, 20, "warm-up-spike").lasting(600),
                // The LR restarts at 1501 (from 0 to 1.4e-3). The norm flares
                // (1589-1623, up to ~100), settles briefly, and from 1684
                // never settles again: above 10 on nearly every step while
                // the loss climbs from 1.68 (1683) to 5.5 (1696); it blows up
                // for good (2.2e7 at 1999). It never recovers.
                Onset::new(1501, 200, "restart-blow-up").lasting(u64::MAX),
            ]),
        ),
        // Norm grows ~15x while the loss falls: no warning.
        ("torch/torch-healthy-111.jsonl", quiet.clone()),
        // 4 data-parallel ranks: no warning, no inspect_worker.
        ("torch/torch-healthy_dp-171.jsonl", quiet),
        // Rank 2's shard is corrupted from 350: rank_outlier soon after.
        (
            "torch/torch-bad_shard-161.jsonl",
            faulty(&[Onset::new(350, 10, "bad-shard").lasting(u64::MAX)]),
        ),
        // The LR jumps x40 at 350: caught at 350-351.
        (
            "torch/torch-lr_blowup-121.jsonl",
            faulty(&[Onset::new(350, 2, "lr-x40").lasting(u64::MAX)]),
        ),
    ]
}

/// The label [`trace_labels`] gives `file`.
pub fn trace_label(file: &str) -> Option<Label> {
    trace_labels().into_iter().find(|(f, _)| *f == file).map(|(_, l)| l)
}
