"""The sentiment_zh training texts (labels dropped) as a BERT-format corpus: one review per document,
split after punctuation into pieces of at least 12 characters. Used only for the domain-adaptive probe."""
import json
import re
import sys

src, dst = sys.argv[1], sys.argv[2]  # .../sentiment_zh/train.jsonl, reviews_train.txt
with open(dst, "w", encoding="utf-8") as out:
    for line in open(src, encoding="utf-8"):
        text = json.loads(line)["text"].strip()
        pieces, cur = [], ""
        for s in re.split(r"(?<=[。！？!?；;，,.])", text):
            cur += s
            if len(cur) >= 12:
                pieces.append(cur)
                cur = ""
        if cur:
            pieces.append(cur)
        if pieces:
            out.write("\n".join(pieces) + "\n\n")
