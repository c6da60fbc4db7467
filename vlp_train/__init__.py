"""vlp-train: the streaming multi-granular (region-tag, region-phrase, image-sentence) trainer."""
