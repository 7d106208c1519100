set -e
echo "hello 1.0, installed $(date -u +%FT%TZ)" > ../../hello-version
