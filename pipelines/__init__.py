"""vlp-data: Apache Beam pipelines that build a weakly aligned image-text corpus by retrieval."""
