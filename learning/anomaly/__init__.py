"""Federated anomaly detection trained on normal images only (FedDis, Bercea et al., NMI 2022).

- :mod:`.model`: a disentangled convolutional autoencoder — a *shape* branch (aggregated across
  sites) and an *appearance* branch plus the merging layer (kept on each site);
- :mod:`.losses`: reconstruction (L1) plus FedDis' latent terms: shape consistency under an
  intensity (gamma) shift and orthogonality of appearance to shape codes;
- :mod:`.train`: local training steps on a site's normal images;
- :mod:`.scoring`: anomaly maps (smoothed reconstruction residual), image scores, per-site thresholds;
- :mod:`.metrics`: image AUROC, pixel AUPRC, best Dice and Dice at the site threshold;
- :mod:`.data`: PneumoniaMNIST and brain FLAIR as normal-only training sites with held-out tests;
- :mod:`.serving`: one image → score, the site threshold's verdict, anomaly map (PNG);
- :mod:`.site_state`: what a box keeps to itself (local tensors, thresholds).

Brain lesion masks are automatic (DLWMLS), not drawn by hand: every report on them says so.
"""
