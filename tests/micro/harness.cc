// Test harness for the generated model_settings.h (tests/test_commands.py): the C++ side of the
// preprocessing lookup, the frame checks and the decision, checked against the Python runtime.
//   harness FRAMES INPUTS ROWS  ->  FRAMES: uint8 frames (kInputSize bytes each); INPUTS: written,
//   their int8 model inputs; ROWS: int8 class-output rows (kNumClasses each). Prints one line
//   "frame K CODE" per frame (CheckFrame, or -1 without a gate) and "row K CLASS" per row.
#include <cstdio>
#include <vector>

#include "example_image.h"
#include "model_settings.h"

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  std::FILE* frames = std::fopen(argv[1], "rb");
  std::FILE* inputs = std::fopen(argv[2], "wb");
  std::FILE* rows = std::fopen(argv[3], "rb");
  if (!frames || !inputs || !rows) return 2;
  std::vector<uint8_t> frame(lungedge::kInputSize);
  std::vector<int8_t> input(lungedge::kInputSize);
  for (int k = 0; std::fread(frame.data(), 1, frame.size(), frames) == frame.size(); ++k) {
    for (int i = 0; i < lungedge::kInputSize; ++i)
      input[i] = lungedge::kPixelToInput[i % lungedge::kInputChannels][frame[i]];
    std::fwrite(input.data(), 1, input.size(), inputs);
    std::printf("frame %d %d\n", k, lungedge::CheckFrame(frame.data()));
  }
  int8_t row[lungedge::kNumClasses];
  for (int k = 0; std::fread(row, 1, sizeof(row), rows) == sizeof(row); ++k)
    std::printf("row %d %d\n", k, lungedge::Decide(row));
  std::printf("example %d\n", static_cast<int>(sizeof(kExampleImage)));
  std::fclose(frames);
  std::fclose(inputs);
  std::fclose(rows);
  return 0;
}
