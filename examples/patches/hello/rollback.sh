rm -f ../../hello-version
