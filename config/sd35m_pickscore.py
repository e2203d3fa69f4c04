# The paper's first experiment: PickScore as an adversary, trained on reference-vs-generation pairs whenever
# generations out-score the references (its last pickscore_train_last_k = 1 vision layer, as the published
# code; the paper's text says 2). Everything else as config/sd35m_dino.py.
base = "sd35m_dino.py"
reward = {"pickscore_adv": 1.0}
out_dir = "out/sd35m_pickscore"
