"""What runs on a bare GPU node (torch, transformers, sentence-transformers, webdataset; no Beam,
FAISS, spaCy or gensim): the GPU benchmarks and the code they time must import without those."""
import subprocess
import sys

GPU_NODE_MODULES = ["pipelines.search", "pipelines.encoding", "pipelines.wds", "vlp_train.train",
                    "bench.train", "bench.retrieval"]
NOT_ON_A_GPU_NODE = ["apache_beam", "faiss", "spacy", "gensim", "cv2"]


def test_gpu_benchmarks_import_without_beam_faiss_spacy_or_gensim():
    code = (f"import sys\nfor m in {GPU_NODE_MODULES!r}: __import__(m)\n"
            f"print(sorted(m for m in {NOT_ON_A_GPU_NODE!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
