set -x
date -u +%FT%TZ
START=$(date +%s)
python3 -m venv /root/.cache/llumlet-rs/vllm-0.18.0
/root/.cache/llumlet-rs/vllm-0.18.0/bin/pip install --upgrade pip
/root/.cache/llumlet-rs/vllm-0.18.0/bin/pip install vllm==0.18.0
RC=$?
END=$(date +%s)
echo "RC=$RC ELAPSED=$((END-START))s"
date -u +%FT%TZ
