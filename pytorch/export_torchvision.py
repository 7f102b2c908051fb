"""Export a torchvision ResNet to a safetensors file kiln fine-tunes from.

    python pytorch/export_torchvision.py resnet18 resnet18-imagenet.safetensors
    train --model resnet18 --dataset folder --data-dir photos --image-size 128 \
          --init-weights resnet18-imagenet.safetensors --finetune

Downloads torchvision's ImageNet weights (`--weights DEFAULT`, torchvision's own cache) or
takes a state_dict saved with torch.save (`--state-dict FILE`, e.g. a model you trained in
PyTorch); `--weights none` exports the random initialisation (tests, no network needed). The
names are torchvision's, which are kiln's; the metadata says what kiln cannot see in the
tensors: the model, the ImageNet stem, and the normalisation the weights were trained with.
"""

import argparse

import torch
import torchvision
from safetensors.torch import save_file

MODELS = ("resnet18", "resnet34", "resnet50")
# torchvision's ImageNet normalisation, which its pretrained weights expect.
IMAGENET_MEAN = "0.485,0.456,0.406"
IMAGENET_STD = "0.229,0.224,0.225"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("out", help="the .safetensors file to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", default="DEFAULT",
                        help="torchvision weights enum name (DEFAULT, IMAGENET1K_V1, ...) or none")
    source.add_argument("--state-dict", help="a torch.save'd state_dict of the same model")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="the classifier's classes (default: the weights' own, 1000)")
    args = parser.parse_args()

    build = getattr(torchvision.models, args.model)
    if args.state_dict:
        state = torch.load(args.state_dict, map_location="cpu", weights_only=True)
        classes = state["fc.weight"].shape[0]
        model = build(num_classes=classes)
        model.load_state_dict(state)
    elif args.weights.lower() == "none":
        model = build(num_classes=args.num_classes or 1000)
    else:
        model = build(weights=args.weights)
    if args.num_classes and model.fc.out_features != args.num_classes:
        # A classifier for other classes starts afresh; kiln's --finetune would do the same.
        model.fc = torch.nn.Linear(model.fc.in_features, args.num_classes)

    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "model": args.model,
        "stem": "imagenet",
        "width": str(model.conv1.out_channels),
        "num_classes": str(model.fc.out_features),
        "normalize_mean": IMAGENET_MEAN,
        "normalize_std": IMAGENET_STD,
        "source": f"torchvision {torchvision.__version__}: "
                  + (args.state_dict or f"{args.model} weights={args.weights}"),
    }
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {len(tensors)} tensors, {metadata['source']}")


if __name__ == "__main__":
    main()
