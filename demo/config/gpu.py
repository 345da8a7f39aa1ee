# On a CUDA GPU (`make demo DEMO_ARGS=--gpu`, `python -m demo --gpu`): a 125M model on all the man pages,
# at GPT-2-small's sequence length and learning rates.

work_dir = "runs/demo-gpu"

# corpora and tokenizers
pages_per_language = 100_000  # more than Debian has: every page
base_vocab = 8000
new_pieces = 8000

# model and batches
model = "125m"
seq_len = 1024
global_batch = 64
micro_batch = 16  # gradient accumulation: 4 forward passes per step
device = "cuda"

# steps and rates
phase1_steps = 4000
phase2_steps = 2000
eval_every = 200
eval_batches = 16
max_lr = 6e-4
min_lr = 6e-5
