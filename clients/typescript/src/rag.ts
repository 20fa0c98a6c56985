// Answer a question from the document it retrieves, on lemonade-grpc's
// default models (`make run`): embed the documents and the question with
// smollm2-embed, rank the documents by cosine similarity (unit vectors: a
// dot product), and ask smollm2 to answer from the best one.
//   npm run rag -- 127.0.0.1:50051 "What is the capital of France?"
import { connect, errorDetails } from "./index.js";

const DOCUMENTS = [
  "The cat sat on the mat and purred.",
  "Paris is the capital of France.",
  "Python is a popular programming language.",
  "The stock market fell sharply today.",
  "It rained all day in London.",
];

const [address = "127.0.0.1:50051", question = "What is the capital of France?"] = process.argv.slice(2);
const client = connect(address, { idleConnectionTimeoutMs: 1000 });

try {
  const { embeddings } = await client.inference.embed({ model: "smollm2-embed", inputs: [...DOCUMENTS, question] });
  const query = embeddings[embeddings.length - 1].values;
  const scores = embeddings.slice(0, -1).map((d) => d.values.reduce((sum, value, i) => sum + value * query[i], 0));
  const best = DOCUMENTS[scores.indexOf(Math.max(...scores))];
  let answer = "";
  const messages = [
    { role: "system", content: `Answer in one sentence, using only this context: ${best}` },
    { role: "user", content: question },
  ];
  for await (const reply of client.inference.chat({ model: "smollm2", messages, temperature: 0, maxTokens: 48 })) {
    answer += reply.text;
  }
  const oneLine = answer.split(/\s+/).filter(Boolean).join(" "); // whatever the model wrote
  console.log(`question: ${question}\ncontext:  ${best}\nanswer:   ${oneLine}`);
} catch (error) {
  const details = errorDetails(error);
  console.error(`${details.code} ${details.reason}: ${details.message}`);
  process.exitCode = 1;
}
