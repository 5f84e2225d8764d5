"""The dev reviews a fine-tuned model gets most confidently wrong (run folder paths of this session)."""
import json, torch
torch.set_num_threads(1)
from fastbert import BertForSequenceClassification
from fastbert.tokenization import load_tokenizer
m = BertForSequenceClassification.from_pretrained('/tmp/zh2/ft/random-e6-1e-3').eval()
tok = load_tokenizer('/tmp/zh2/ft/random-e6-1e-3')
dev = [json.loads(l) for l in open('/work/shared/data/sentiment_zh/dev.jsonl')]
rows = []
with torch.no_grad():
    for ex in dev:
        ids = tok.encode(ex['text']).ids[:128]
        p = torch.softmax(m(input_ids=torch.tensor([ids])).logits[0], -1)
        rows.append((float(p[1 - ex['label']]), ex['label'], ex['text']))
rows.sort(reverse=True)
wrong = [r for r in rows if r[0] > 0.5]
print(len(wrong), "wrong of", len(rows))
for conf, lab, t in rows[:25]:
    print(f"{conf:.2f} label={lab} {t[:90]}")
