"""Downstream dataset readers, one module per task (vqa, nlvr2, snli_ve, refcoco, retrieval,
easy_vqa); the shared record types and the interface are described in common.py, the image-key
mapping in images.py."""
