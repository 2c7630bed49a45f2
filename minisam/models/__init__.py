from .wide_resnet import (WRN_PRESETS, WideResnet, WideResnetBlock, WideResnetGroup,
                          parse_wrn_name, wide_resnet)

__all__ = ["WRN_PRESETS", "WideResnet", "WideResnetBlock", "WideResnetGroup", "parse_wrn_name",
           "wide_resnet"]
