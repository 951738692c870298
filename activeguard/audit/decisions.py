"""Default settings and decision thresholds of the three black-box audits, in one torch-free place.

Every value was read off `activeguard evaluate audit` (MNIST LeNet-5, default zoo, seed 0) or the
demo; the CLI imports this module to show defaults in ``--help`` without loading torch.
"""

# IPGuard margin k: k = 3 gave IPGuard-TL its best ARUC (k = 1: 0.66, 3: 0.68, 10: 0.46, 20: 0.23);
# a larger margin makes independent models agree with the owner too, so uniqueness falls.
IPGUARD_K = 3.0
# IPGuard matching rate at which a suspect is judged a copy: at k = 3 the post-processed copies
# matched 0.64-1.00 and every independent model (other seeds, architectures, forests) 0.07-0.49.
# Surrogates retrained on the owner's labels matched 0.17-0.42: IPGuard does not catch extraction.
IPGUARD_THRESHOLD = 0.55
# CEM CAEAcc threshold: post-processed copies 0.79-1.00, independently trained models up to 0.74,
# surrogates 0.62-0.65 (CEM ranks them above the references, ROC AUC 0.71, but not above 0.75).
CEM_THRESHOLD = 0.75
# TAFA (reconstruction, distance statistic on softmax scores): the demo's fine-tuned and pruned
# copies score about 0.75, an independently trained LeNet-5 about 0.2.
TAFA_THRESHOLD = 0.5

THRESHOLDS = {"ipguard": IPGUARD_THRESHOLD, "cem": CEM_THRESHOLD, "tafa": TAFA_THRESHOLD}
