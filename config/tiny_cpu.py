# Tiny model for a laptop CPU: the README quick start trains it on the built-in demo corpus
# (Russian literature, tokenized by `python prepare.py` with sp:8192) in 5-8 minutes on 2 idle cores.
# Parameters (python train.py config/tiny_cpu.py --dry_run --vocab_size=4096): 2,410,176 total, 1,623,744 non-embedding
# Hardware: any CPU; fp32 (bf16 is several times slower on most CPUs).
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
learning_rate = 2e-3  # small models tolerate (and need) a high learning rate
min_lr = 2e-4
warmup_iters = 30
max_iters = 400
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 100
eval_iters = 10
log_interval = 10
device = "cpu"
compile = False
