"""Transfer to detection (DESIGN §4 "Transfer"): an open-vocabulary Faster R-CNN on a CLIP ResNet.

- :mod:`regionclip.transfer.classifier`: the text-embedding classifier and its loss (pure maths);
- :mod:`regionclip.transfer.torchvision_rcnn`: the C4 detector from torchvision pieces;
- :mod:`regionclip.transfer.engine`: training, evaluation (AP50 base/novel/all) and `make transfer`.
"""

from regionclip.transfer.classifier import TextClassifier, ov_classification_loss
from regionclip.transfer.engine import TransferError, run_transfer
from regionclip.transfer.torchvision_rcnn import OpenVocabFasterRCNN, build_detector

__all__ = [
    "OpenVocabFasterRCNN",
    "TextClassifier",
    "TransferError",
    "build_detector",
    "ov_classification_loss",
    "run_transfer",
]
