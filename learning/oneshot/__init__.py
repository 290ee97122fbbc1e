"""One-shot federated learning by image synthesis and ensemble distillation (FedISCA).

Kang et al., "One-Shot Federated Learning on Medical Data Using Knowledge Distillation with Image
Synthesis and Client Model Adaptation", MICCAI 2023. Each site trains once on its own data and
uploads its model once; the coordinator, holding no images,

1. synthesizes images from noise by inverting the site models (:mod:`learning.oneshot.synthesis`):
   cross-entropy of the ensemble on chosen target labels, plus matching each BatchNorm layer's
   running mean and variance by the statistics of the synthetic batch, plus image priors (total
   variation, an optional L2 norm), with random jitter — DeepInversion (Yin et al., CVPR 2020)
   on an ensemble;
2. distills the ensemble (mean of the site models' logits) into one global model on every
   intermediate image of the synthesis, from noise to the final image
   (:mod:`learning.oneshot.distill`): KL divergence to the ensemble's softened outputs;
3. adapts the client models to the synthetic images (the paper's "client model adaptation",
   :func:`learning.oneshot.ensemble.batch_statistics_teacher`): early, noise-like images are
   labelled by a copy of the ensemble whose BatchNorm layers normalize with the batch's own
   statistics rather than the site's, the later ones by the ensemble as uploaded, mixed by a
   weight that moves from the adapted to the original teacher along the synthesis.

**The method needs BatchNorm** (:mod:`learning.oneshot.models`): the site statistics it
inverts are BatchNorm running statistics. The rest of fedscan defaults to GroupNorm (DP-SGD
refuses BatchNorm, and its statistics suffer under label skew); the one-shot job builds its
models with ``norm="batch"`` and refuses a model without BatchNorm (``batchnorm_required``).

The pipeline is :func:`learning.oneshot.fedisca.one_shot`. Site models may differ in
architecture (the ensemble only averages logits, every model's own BatchNorm layers are matched),
as the paper's heterogeneous-model experiments do.
"""
