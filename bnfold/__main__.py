from bnfold.cli import console_script

console_script()
