#!/bin/sh
# Checks of the git role: init, commit with the default identity, default branch.
set -eu
d=$(mktemp -d)
cd "$d"
git init -q .
echo hi > f
git add f
git commit -qm first
test "$(git symbolic-ref --short HEAD)" = main
git log --format=%an | grep -q .
HOME="$d" kiln-git-identity "Agent" "agent@example.invalid"
test "$(HOME=$d git config user.email)" = agent@example.invalid
echo "git: ok ($(git --version))"
