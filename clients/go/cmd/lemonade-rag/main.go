// Command lemonade-rag answers a question from the document it retrieves,
// on lemonade-grpc's default models (`make run`): it embeds the documents
// and the question with smollm2-embed, ranks the documents by cosine
// similarity (the vectors are unit length: a dot product), and asks
// smollm2 to answer from the best one.
//
//	go run ./cmd/lemonade-rag -address 127.0.0.1:50051 "What is the capital of France?"
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"strings"
	"time"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
	"github.com/lemonade-grpc/lemonade-grpc/clients/go/lemonade"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

var documents = []string{
	"The cat sat on the mat and purred.",
	"Paris is the capital of France.",
	"Python is a popular programming language.",
	"The stock market fell sharply today.",
	"It rained all day in London.",
}

func main() {
	address := flag.String("address", "127.0.0.1:50051", "server address")
	flag.Parse()
	question := "What is the capital of France?"
	if flag.NArg() > 0 {
		question = flag.Arg(0)
	}
	if err := run(*address, question); err != nil {
		if details, ok := lemonade.Details(err); ok {
			log.Fatalf("%s %s: %s", details.Code, details.Reason, details.Message)
		}
		log.Fatal(err)
	}
}

func run(address, question string) error {
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	inference := lemonadev1.NewInferenceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	embedded, err := inference.Embed(ctx, &lemonadev1.EmbedRequest{
		Model:  "smollm2-embed",
		Inputs: append(append([]string{}, documents...), question),
	})
	if err != nil {
		return err
	}
	vectors := embedded.GetEmbeddings()
	query := vectors[len(vectors)-1].GetValues()
	best, bestScore := 0, float32(-2)
	for i, document := range vectors[:len(vectors)-1] {
		var score float32
		for j, value := range document.GetValues() {
			score += value * query[j]
		}
		if score > bestScore {
			best, bestScore = i, score
		}
	}

	stream, err := inference.Chat(ctx, &lemonadev1.ChatRequest{
		Model:       "smollm2",
		Temperature: proto.Float32(0),
		MaxTokens:   proto.Uint32(48),
		Messages: []*lemonadev1.ChatMessage{
			{Role: "system", Content: "Answer in one sentence, using only this context: " + documents[best]},
			{Role: "user", Content: question},
		},
	})
	if err != nil {
		return err
	}
	var answer strings.Builder
	for {
		reply, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		answer.WriteString(reply.GetText())
	}
	fmt.Printf("question: %s\ncontext:  %s\nanswer:   %s\n", question, documents[best], strings.Join(strings.Fields(answer.String()), " "))
	return nil
}
