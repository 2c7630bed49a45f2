from .wide_resnet import PRESETS, WideResnet, WideResnetBlock, WideResnetGroup, parse_wrn_name, wide_resnet

__all__ = ["PRESETS", "WideResnet", "WideResnetBlock", "WideResnetGroup", "parse_wrn_name",
           "wide_resnet"]
