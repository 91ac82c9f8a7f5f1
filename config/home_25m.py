# Home-sized model, 512 hidden / 8 layers / 8 heads: trains on one consumer GPU.
# Parameters (python train.py config/home_25m.py --dry_run --vocab_size=32000): 43,655,680 total, 27,271,680 non-embedding
# Hardware: one GPU with 8+ GB: the plan (train.py --dry_run) is 6.2 GiB in bf16 at this batch.
data_dir = "data/demo"
out_dir = "out-home-25m"

n_layer = 8
n_head = 8
n_embd = 512
block_size = 1024

batch_size = 16
gradient_accumulation_steps = 4
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
max_iters = 10000
eval_interval = 500
