# Qwen2.5-3B-shaped model (36 layers, hidden 2048, 16 heads, 8 KV heads, FFN 11008, qkv bias,
# RoPE theta 1e6, context 32768, vocab 151936). Despite the file name the arithmetic says:
# Parameters (python train.py config/qwen_2_5b.py --dry_run): 3,199,240,192 total, 2,888,075,264 non-embedding
# Memory per GPU from the plan train.py checks before every run (python train.py
# config/qwen_2_5b.py --dry_run under torchrun prints it in full; hardware.memory_table):
#   DDP      grad_checkpoint=False:   79.4 GiB
#   DDP      grad_checkpoint=True :   58.0 GiB
#   FSDP x8  grad_checkpoint=False:   41.2 GiB
#   FSDP x8  grad_checkpoint=True :   22.3 GiB
# (FSDP x4: 47.2 / 28.2 GiB. Gradient accumulation under FSDP holds 11.9 GiB of unsharded fp32
# gradients between micro-steps; the chunked loss keeps the 152k-vocab logits small.)
# Hardware: FSDP (the default here) over 4-8 GPUs of 80 GB without activation checkpointing,
# which would cost ~1/3 more FLOPs; on 40-48 GB cards add --grad_checkpoint=True. DDP keeps the
# whole optimizer state on every GPU: only 80 GB cards with grad_checkpoint, little room to spare.
#   torchrun --nproc_per_node=8 train.py config/qwen_2_5b.py
vocab_size = 151936
n_layer = 36
n_head = 16
n_kv_head = 8
n_embd = 2048
ffn_hidden = 11008
qkv_bias = True
tie_embeddings = True
rope_theta = 1e6
norm_eps = 1e-6
max_seq_len = 32768  # the model's context window; training windows are block_size
block_size = 4096

data_dir = "data/demo"  # what `python prepare.py` writes; for your corpus, e.g. --data_dir=data/fineweb2_ru
out_dir = "out-qwen-2-5b"
parallel = "fsdp"
grad_checkpoint = False  # fits 80 GB cards under FSDP; --grad_checkpoint=True for 40-48 GB
dtype = "bfloat16"

batch_size = 1
gradient_accumulation_steps = 16
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
max_iters = 100000
eval_interval = 1000
eval_iters = 20
