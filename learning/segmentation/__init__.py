"""The segmentation job: a MONAI U-Net over sites of different modalities, with per-site adaptive DP.

Modules, one job each: ``data`` (PH2 dermoscopy + brain FLAIR in one common input, site and
held-out splits), ``model`` (U-Net, Dice + CE loss, per-case Dice), ``sharing`` (which tensors
travel: FedAvg / FedBN / local head), ``privacy`` (DP-SGD with quantile-based adaptive clipping,
noise calibrated to each site's own ε), ``client`` (one site's round), ``server`` (one round's
aggregation, the rule passed in), ``serving`` (image → mask + lesion area), ``errors``. The
in-process runs and baselines of the benchmark compose these with the coordinator's strategies
in ``fedscan.segment_arms``.
"""
