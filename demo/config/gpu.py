# On a CUDA GPU (`make demo DEMO_ARGS=--gpu`, `python -m demo --gpu`): a 125M model (over 100M parameters)
# on every man page (plus `--extra-old PATH --extra-new PATH`), at GPT-2-small's sequence length and rates.
# Sized for about 10 minutes of training on one H100/H200, from an estimated 150-250k tokens/s for 125M in
# bf16 autocast without compile: phase 1, the union (phase 1 + phase 2 steps) and the seven headline phase-2
# runs make 2 x 800 + 8 x 200 = 3,200 steps of 32 x 1024 tokens, about 105M tokens. NOT YET MEASURED: the
# session that sized it had no GPU; measure it and resize the steps here.

work_dir = "runs/demo-gpu"

# corpora and tokenizers
pages_per_language = 100_000  # more than Debian has: every page
min_pages = 1400  # manpages-de has about 1,470 pages; fewer means the package is missing
base_vocab = 8000
new_pieces = 8000

# model and batches
model = "125m"
seq_len = 1024
global_batch = 32
micro_batch = 16  # gradient accumulation: 2 forward passes per step
device = "cuda"

# steps and rates
phase1_steps = 800
phase2_steps = 200
eval_every = 50
eval_batches = 8
max_lr = 6e-4
min_lr = 6e-5
