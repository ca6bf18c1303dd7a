#!/bin/sh
# Install Chromium and chromedriver (Debian packages) when either is missing: the painter's browser
# tests need them. Runs apt-get as root, or through sudo.
set -eu
have() { command -v "$1" >/dev/null 2>&1; }
if { have chromium || have chromium-browser || have google-chrome; } && have chromedriver; then
    exit 0
fi
if ! have apt-get; then
    echo "error: Chromium or chromedriver is missing and there is no apt-get to install them; install both" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "installing chromium and chromium-driver (apt-get) for the painter's browser tests ..." >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
