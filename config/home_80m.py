# Home-sized model, 768 hidden / 12 layers / 12 heads (GPT-2-small shape with a modern block).
# Parameters (python train.py config/home_80m.py --dry_run --vocab_size=32000): 109,529,856 total, 84,953,856 non-embedding
# Hardware: one GPU with 16+ GB (plan: 11.9 GiB in bf16 at this batch), or several with torchrun (DDP).
data_dir = "data/demo"
out_dir = "out-home-80m"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024

batch_size = 16
gradient_accumulation_steps = 8
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 500
max_iters = 20000
eval_interval = 1000
