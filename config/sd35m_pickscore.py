# The paper's first experiment: PickScore as an adversary, trained on reference-vs-
# generation pairs whenever generations out-score the references.
exec(open("config/sd35m_dino.py").read())
reward = {"pickscore_adv": 1.0}
pickscore_model = "yuvalkirstain/PickScore_v1"
pickscore_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
pickscore_train_last_k = 1     # published code 1; the paper's text 2
pickscore_lr = 5e-6
out_dir = "out/sd35m_pickscore"
