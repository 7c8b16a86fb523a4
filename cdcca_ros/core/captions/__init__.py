"""Image captioning: the COCO caption metrics (BLEU-4, CIDEr-D) without Java."""
