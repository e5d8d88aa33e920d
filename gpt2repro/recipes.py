"""The training recipes and presets of train_accelerate.py, as plain data.

train_accelerate.py's flag defaults are build-nanogpt's GPT-2 124M run. A recipe is what --recipe changes from them;
a preset is complete: it names its recipe and lists every value it sets over that recipe's, so one table row says
what a run trains. Values given on the command line win over both.
"""
from __future__ import annotations

RECIPES = {
    "gpt2": {},  # the flags' defaults
    # modded-nanogpt's GPT-2 speedrun (Nov 2024 records): rotary, QK-norm, ReLU², parameter-free RMSNorm, no biases,
    # untied zero-initialised head, zero-initialised projections, logits soft-capped at 30; Muon (lr 0.04) on the
    # blocks' matrices, Adam (betas 0.8, 0.95, no decay) on the rest: embeddings 0.6, head 0.008 (biases and gains,
    # if turned back on, 0.04); no warm-up, constant LR, then a linear decay to zero over the last ~30% of the steps
    # (914 of 3000).
    "speedrun": dict(position_embedding="rope", qk_norm=True, mlp_activation="relu2", norm="rmsnorm",
                     tie_word_embeddings=False, logit_softcap=30.0, zero_init_residual=True, bias=False,
                     optimizer="muon", muon_lr=0.04, embed_lr=0.6, head_lr=0.008, adamw_lr=0.04, beta1=0.8,
                     weight_decay=0.0, lr_schedule="trapezoid", warmup_steps=0, min_lr=0.0, cooldown_frac=0.3),
}

# The demo: a small GPT on the embedded corpus that shows a falling validation loss in ~5 minutes on 2 CPU cores.
CPU_DEMO = dict(
    data_dir="data/kjv",
    n_layer=4, n_head=4, n_embd=64, seq_len=128,  # the 50304 x 64 lm_head is most of the FLOPs
    micro_batch_size=8, total_batch_size=8 * 128,  # one micro-batch per step: 1024 tokens
    max_lr=3e-3, min_lr=3e-4,  # a small model takes a larger LR; min stays 10% of max as in the recipe
    eval_every=100, val_tokens=8 * 128 * 16, checkpoint_every=400,  # val: 16 batches of 8 x 128
    hellaswag=False,  # 10,042 examples would take longer than the run, and a model this small scores chance
)

PRESETS = {
    # build-nanogpt's GPT-2 124M run on FineWeb-Edu sample-10BT: the flags' defaults.
    "gpt2-124m": dict(recipe="gpt2", data_dir="data/edu_fineweb10B", output_dir="runs/gpt2-124m"),
    # The speedrun recipe at GPT-2 124M on FineWeb-Edu: modded-nanogpt's Nov 2024 records reached FineWeb val loss
    # 3.28 in 2.40B tokens; 4578 steps x 2**19 = 2.40B. Unverified on GPU here.
    "speedrun-124m": dict(recipe="speedrun", data_dir="data/edu_fineweb10B", output_dir="runs/speedrun-124m",
                          max_steps=4578),
    # The larger GPT-2s as llm.c trained them (its run scripts): AdamW, weight decay 0.1, 700 warm-up steps. The step
    # counts are llm.c's token budgets: 60,000 x 2**19 = 31.5B; 286,102 x 2**19 = 150B; 32,000 x 2**20 = 33.6B. Their
    # data: FineWeb-Edu sample-100BT (sample-350BT for 774M's 150B), `prepare_data.py --dataset fineweb-edu
    # --fineweb_config ...`. micro_batch_size is llm.c's per GPU; see `--dry_run` for what fits a device.
    "gpt2-350m": dict(recipe="gpt2", data_dir="data/edu_fineweb100B", output_dir="runs/gpt2-350m",
                      n_layer=24, n_head=16, n_embd=1024, micro_batch_size=64,
                      max_lr=3e-4, min_lr=0.0, warmup_steps=700, max_steps=60000),
    "gpt2-774m": dict(recipe="gpt2", data_dir="data/edu_fineweb350B", output_dir="runs/gpt2-774m",
                      n_layer=36, n_head=20, n_embd=1280, micro_batch_size=32,
                      max_lr=2.5e-4, min_lr=0.0, warmup_steps=700, max_steps=286102),
    "gpt2-1558m": dict(recipe="gpt2", data_dir="data/edu_fineweb100B", output_dir="runs/gpt2-1558m",
                       n_layer=48, n_head=25, n_embd=1600, micro_batch_size=16, total_batch_size=2**20,
                       max_lr=6e-4, min_lr=6e-5, warmup_steps=700, max_steps=32000),  # cosine to 10%
    "cpu-demo": dict(recipe="gpt2", **CPU_DEMO, output_dir="runs/cpu-demo",
                     warmup_steps=20, max_steps=800),  # 819,200 tokens, most of one epoch of the ~0.94M train tokens
    # The speedrun recipe on the demo model, tuned on it (600-step runs, val loss at the end): Muon momentum
    # 0.95 -> 0.8 and embeddings' LR 0.1 -> 0.3 took 4.436 to 4.314; Muon LR 0.025 and 0.06 did no better than 0.04,
    # nor head LR 0.02. No soft-cap: with it, 4.438 instead of 4.436, for a tanh over all (1024, 50304) logits that
    # costs ~0.18 s a step on 2 CPU cores. 550 steps take the wall-clock of the GPT-2 recipe's 800 here (285 s against
    # 299 s): a speedrun step costs ~1.4x, about half of it Muon's step, whose Newton-Schulz torch runs in bf16
    # (emulated on AVX2). Every group's LR ends at min_lr / max_lr = 10% of its peak, as the demo's AdamW does.
    "cpu-demo-speedrun": dict(recipe="speedrun", **CPU_DEMO, output_dir="runs/cpu-demo-speedrun",
                              logit_softcap=None, muon_momentum=0.8, muon_lr=0.04, embed_lr=0.3, head_lr=0.01,
                              adamw_lr=0.01, warmup_steps=20, max_steps=550, cooldown_frac=0.6),
}


# The presets whose data is the embedded corpus, which training prepares into their --data_dir the first time.
EMBEDDED_CORPUS_PRESETS = ("cpu-demo", "cpu-demo-speedrun")


def as_flags(values: dict) -> str:
    """A preset or recipe as the command-line flags that set the same values."""
    return " ".join(f"--{key} {'none' if value is None else value}" if not isinstance(value, bool)
                    else f"--{'' if value else 'no-'}{key}" for key, value in values.items())
