import sys

from llmchat.finetune.run import main

sys.exit(main(sys.argv[1:]))
