# The paper's text-rendering experiment: SD3.5-M learns to write the text a prompt quotes. 8 GPUs:
#   python prepare.py import_prompts --src flow_grpo/dataset/ocr/train.txt --out data/ocr/train.txt
#   python prepare.py import_prompts --src flow_grpo/dataset/ocr/test.txt --out data/ocr/test.txt
#   torchrun --nproc_per_node=8 train.py config/sd35m_ocr.py
# This preset is the published config for it (Adv-GRPO's config/grpo.py, `pickscore_sd3_fast`): Flow-GRPO's
# dataset/ocr prompts, reward 0.5·PickScore + 0.5·OCR (scorers.py: 1 when the quoted text is read, else
# 1 - edit distance / its length), the fast recipe otherwise — so only the prompts and the reward change.
# It is the paper's "Multi-Reward" row (Table 4: OCR 0.91). The paper's own OCR 0.58 → 0.91 (Table 1, the
# same 0.91 as Flow-GRPO on OCR alone) trained λ·R_ocr + (1 - λ)·sim_CLIP(generation, reference) (its Eq. 8,
# λ not given; the maintainers, issue #6: OCR stays a scalar reward, paired with the similarity term). With
# references for the OCR prompts (prepare.py make_references), that is:
#   ... config/sd35m_ocr.py --reward="{'ocr': 0.5, 'clip_sim': 0.5}" --references=data/refs_ocr/index.json
# and with the paper's adversarial DINO reward as the image term: --reward="{'ocr': 0.5, 'dino_adv': 0.5}".
# The held-out evaluation reports `ocr` (the same score) whenever the test prompts quote a text.
base = "sd35m_dino.py"
train_prompts = "data/ocr/train.txt"
test_prompts = "data/ocr/test.txt"
reward = {"pickscore": 0.5, "ocr": 0.5}
out_dir = "out/sd35m_ocr"
