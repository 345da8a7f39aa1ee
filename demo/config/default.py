# The README's main job (`make demo`, `python -m demo`): about 30 minutes on 2 CPU cores.
# A 1M-parameter model sees ~2.5M English tokens, then each phase-2 run ~0.6M German ones; a larger model
# learns less in that wall time on a CPU. (1500 + 400 steps took 41.9 min on a quiet 2-core machine, with
# the same findings.)

work_dir = "runs/demo"  # relative to the repository; --work-dir overrides it

# corpora and tokenizers
pages_per_language = 1500
base_vocab = 4000  # the English tokenizer's pieces
new_pieces = 4000  # German pieces the extension may add

# model and batches
model = "test"
seq_len = 128
global_batch = 16
micro_batch = 16  # the CPU runs the whole batch in one forward pass

# steps
phase1_steps = 1200  # English alone
phase2_steps = 300  # each German run
eval_every = 50
eval_batches = 8
