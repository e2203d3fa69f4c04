# Random-weight tiny SD3 on CPU: exercises the whole loop in seconds (tests, smoke runs).
# The images are noise-like (nothing is pretrained); the reward is mean brightness.
pretrained = "random:tiny"
t5 = False
max_sequence_length = 8
resolution = 32
lora_rank = 4
lora_alpha = 8
mixed_precision = "no"
train_prompts = "assets/tiny_prompts.txt"
test_prompts = "assets/tiny_prompts.txt"
num_steps = 4
guidance_scale = 2.0
group_size = 4
prompts_per_epoch = 2
sample_batch_size = 4
train_batch_size = 2
lr = 1e-3
clip_range = 1e-2
reward = {"brightness": 1.0}
epochs = 2
save_every = 1
out_dir = "out/tiny_random"
eval_every = 0                 # tests that need the held-out evaluation turn it on
