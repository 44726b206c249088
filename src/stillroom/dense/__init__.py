"""Dense prediction: scenes of digits with known masks and boxes, the fully-convolutional
family, CenterNet decoding, mIoU and mAP, and the dense distillation terms (method: dense)."""
