"""Mean attention probability at diagonal offsets -2..+2, per layer and head, over 20 held-out-like sentences."""
import gzip, sys, torch
torch.set_num_threads(1)
from fastbert import BertModel
from fastbert.tokenization import load_tokenizer
path = sys.argv[1]
m = BertModel.from_pretrained(path).eval()
tok = load_tokenizer(path)
lines = [l.strip() for l in gzip.open('/work/shared/data/pretrain/zh.txt.gz', 'rt', encoding='utf-8') if len(l.strip()) > 30]
sents = lines[-20:]  # the last documents of the corpus
acc = None
with torch.no_grad():
    for s in sents:
        ids = torch.tensor([tok.encode(s).ids[:128]])
        att = m(input_ids=ids, output_attentions=True).attentions  # per layer (1, H, S, S)
        S = ids.shape[1]
        rows = []
        for a in att:
            per_head = []
            for h in range(a.shape[1]):
                per_head.append([a[0, h].diagonal(d).mean().item() for d in (-2, -1, 0, 1, 2)])
            rows.append(per_head)
        t = torch.tensor(rows)
        acc = t if acc is None else acc + t
acc /= len(sents)
for l in range(acc.shape[0]):
    for h in range(acc.shape[1]):
        print(f"layer {l} head {h}: " + " ".join(f"{v:.3f}" for v in acc[l, h].tolist()))
