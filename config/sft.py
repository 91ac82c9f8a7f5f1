# Supervised fine-tuning (SFT) on conversations: a pretrained run learns the chat template and to
# answer in turns, with the loss on the assistant's replies only (prepare.py writes that mask).
#     python prepare.py --input chats.jsonl --tokenizer out/tokenizer.model --out_dir data/chat
#     python train.py config/sft.py --init_from=out --data_dir=data/chat
#     python sample.py --chat --out_dir out-chat
# The architecture comes from the --init_from checkpoint; this file sets only data, schedule and
# batch. SFT's usual recipe: a learning rate well below pretraining's, a short schedule (a few
# passes over the conversations at most), no weight decay to pull the weights off what they know.
# Tuned on the chat demo (python prepare.py --demo chat, docs/chat.md) from the tiny_cpu model;
# for a bigger base model, raise block_size (up to its max_seq_len) and max_iters with your data.
init_from = "out"  # the base run: its newest checkpoint; or a ckpt.pt, a ckpt_STEP/ or hf:DIR
data_dir = "data/chat"
out_dir = "out-chat"

block_size = 256  # at most the base model's max_seq_len (tiny_cpu: 256)
batch_size = 16
gradient_accumulation_steps = 1

optimizer = "adamw"
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.0
grad_clip = 1.0
max_iters = 300

eval_interval = 100
eval_iters = 10
log_interval = 10
