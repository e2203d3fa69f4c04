# The random-weight tiny pipeline with the adversarial DINO reward on a random tiny ViT: the whole
# Adv-GRPO path (references, features, D steps, schedules) in seconds on CPU. Not a demonstration.
base = "tiny_random.py"
reward = {"dino_adv": 1.0}
references = "assets/tiny_refs/index.json"
dino_backbone = "random:tiny"
dino_image_size = 28
schedule = "shared"
d_times = 2
epochs = 3
out_dir = "out/tiny_random_adv"
