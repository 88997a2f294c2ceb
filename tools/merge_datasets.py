"""Merge several .bin/.idx datasets into one, streaming.

    python tools/merge_datasets.py --input data/shards --output-prefix data/all
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.data.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
