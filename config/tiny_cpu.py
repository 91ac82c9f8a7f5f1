# Tiny model for a laptop CPU: the README quick start trains it on the built-in demo corpus
# (Russian literature, tokenized by `python prepare.py` with sp:8192) for 5 minutes of wall clock.
# Parameters (python train.py config/tiny_cpu.py --dry_run --vocab_size=8192): 3,196,608 total, 1,623,744 non-embedding
# Hardware: any CPU. --dtype auto trains in bf16 where the CPU is fast at it (AMX, AVX512-BF16), else fp32.
# Tuned for the lowest held-out bits per byte in a few CPU minutes (docs/benchmarks.md, "Quality
# per CPU minute"): at this budget a 4 x 192 model beats wider or deeper ones, which take fewer
# steps, and Muon at a high learning rate beats AdamW by ~0.2 bits per byte.
data_dir = "data/demo"
out_dir = "out"

n_layer = 4
n_head = 4
n_kv_head = 2  # grouped-query attention even at this size, so the demo exercises it
n_embd = 192
block_size = 256
dropout = 0.0

batch_size = 16
gradient_accumulation_steps = 1
optimizer = "muon"  # Muon for the block matrices, AdamW for embedding and norms
learning_rate = 1e-2  # tried 2e-3, 5e-3, 1e-2, 2e-2: 1e-2 was best
min_lr = 1e-3
warmup_iters = 30
weight_decay = 0.1
grad_clip = 1.0

# A time budget rather than a step count: the cosine schedule ends at min_lr when the clock
# runs out, on a fast machine or a slow one. --max_time_min=M changes it; --max_iters=N with
# --max_time_min=None trains N steps instead.
max_iters = None
max_time_min = 5.0

eval_interval = 200  # evaluations count against the budget: few, but over ~66k tokens each
eval_iters = 16  # 16 x 16 windows: the demo's whole val split (67,792 tokens)
log_interval = 10
device = "cpu"
compile = False
