# Home-sized model, 1024 hidden / 16 layers / 16 heads (GQA with 8 KV heads).
# Parameters (python train.py config/home_200m.py --dry_run --vocab_size=32000): 221,545,472 total, 188,777,472 non-embedding
# Hardware: one 24 GB GPU (plan: 20.2 GiB in bf16 at batch 8) or several with torchrun; --grad_checkpoint=True cuts it to 7.4 GiB.
data_dir = "data/demo"
out_dir = "out-home-200m"

n_layer = 16
n_head = 16
n_kv_head = 8
n_embd = 1024
block_size = 2048

batch_size = 8
gradient_accumulation_steps = 8
learning_rate = 4e-4
min_lr = 4e-5
warmup_iters = 1000
max_iters = 30000
eval_interval = 1000
