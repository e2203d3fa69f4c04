# The contrast of make demo: a *fixed* learned reward. The same discriminator, trained for d_warmup epochs
# on the base's generations against the references (10 steps an epoch: a competent head), then frozen; the
# generator then optimises its score like any fixed reward model. Everything else as config/tiny.py.
base = "tiny.py"
schedule = "frozen"
d_warmup = 10
d_steps = 10
out_dir = "out/tiny_frozen"
