// ckpt-writer: the default writer child of the asynchronous checkpointer.
// Started by CheckpointProcess; not meant to be run by hand.
#include <ckpt/writer_main.hpp>

int main(int argc, char** argv) {
  return ckpt::writer_main(argc, argv);
}
