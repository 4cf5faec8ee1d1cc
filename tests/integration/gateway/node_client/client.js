// Streams one Generate call through the gateway with @grpc/grpc-js, loading the repository's protos.
//
// usage: node client.js HOST:PORT API_KEY PROMPT [ADAPTER_ID]
// Prints one JSON line per chunk, then {"done": true, ...}; on a failed call prints
// {"error": true, "code": <grpc status number>, "details": ...} and exits 1.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "../../../../protos");

function main() {
  const [target, apiKey, prompt, adapterId] = process.argv.slice(2);
  const definition = protoLoader.loadSync("openlora/v1/inference.proto", {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const openlora = grpc.loadPackageDefinition(definition).openlora.v1;
  const client = new openlora.Inference(target, grpc.credentials.createInsecure());

  const metadata = new grpc.Metadata();
  if (apiKey) metadata.add("authorization", `Bearer ${apiKey}`);
  const request = { text: prompt, sampling: { max_new_tokens: 5 } };
  if (adapterId) request.adapter_ref = { id: adapterId };

  const deadline = new Date(Date.now() + 30000);
  const call = client.Generate(request, metadata, { deadline });
  let chunks = 0;
  let tokens = 0;
  let failed = false;
  call.on("data", (chunk) => {
    chunks += 1;
    tokens += chunk.token_ids.length;
    console.log(JSON.stringify({ text: chunk.text, token_ids: chunk.token_ids, finish_reason: chunk.finish_reason }));
  });
  call.on("error", (err) => {
    failed = true;
    console.log(JSON.stringify({ error: true, code: err.code, details: err.details }));
    client.close();
    process.exitCode = 1;
  });
  // grpc-js may still emit "end" after "error"; only a clean end is reported as done.
  call.on("end", () => {
    if (failed) return;
    console.log(JSON.stringify({ done: true, chunks, tokens }));
    client.close();
  });
}

main();
