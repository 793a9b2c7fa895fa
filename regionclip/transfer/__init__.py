"""Transfer to detection: an open-vocabulary Faster R-CNN on a CLIP ResNet.

- :mod:`regionclip.transfer.classifier`: the text-embedding classifier and its loss (pure maths);
- :mod:`regionclip.transfer.torchvision_rcnn`: the C4 detector from torchvision pieces;
- :mod:`regionclip.transfer.vocabulary`: class-embedding rows by category name;
- :mod:`regionclip.transfer.detectron2`: the same detector as a Detectron2 plugin.

Training and evaluating it (`make transfer`) is the stage :mod:`regionclip.stages.transfer`.
"""

from regionclip.transfer.classifier import TextClassifier, ov_classification_loss
from regionclip.transfer.torchvision_rcnn import OpenVocabFasterRCNN, build_detector

__all__ = ["OpenVocabFasterRCNN", "TextClassifier", "build_detector", "ov_classification_loss"]
