// Drives a real Atelier server with npm's `replicate` client (1.4), as a JS user would; prints one JSON
// object of what each call returned. Run by tests/e2e/test_js_clients.py with NODE_PATH set to where
// the package is installed, and REPLICATE_BASE_URL (with /v1), REPLICATE_API_TOKEN and IMAGE (a PNG path).
"use strict";
const fs = require("node:fs");
const Replicate = require("replicate");

async function main() {
  const replicate = new Replicate({ auth: process.env.REPLICATE_API_TOKEN, baseUrl: process.env.REPLICATE_BASE_URL });
  const image = fs.readFileSync(process.env.IMAGE);
  const seen = {};
  seen.buffer = await replicate.files.create(image, { purpose: "js" }); // metadata goes as a JSON Blob part
  seen.blob = await replicate.files.create(new Blob([image], { type: "image/png" }));
  seen.versions = await replicate.models.versions.list("openai", "gpt-image-2");
  // run() uploads Buffer and Blob inputs through files.create, in order, and sends their urls.get
  const images = [image, new Blob([image], { type: "image/png" })];
  seen.run = await replicate.run("openai/gpt-image-2", {
    input: { prompt: "make it red", input_images: images, output_format: "png" },
  });
  seen.list = await replicate.files.list();
  const listed = await replicate.predictions.list();
  seen.prediction = listed.results[0];
  process.stdout.write(JSON.stringify(seen));
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
