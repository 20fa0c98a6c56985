package lemonade_test

import (
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// TestExampleApps runs cmd/lemonade-rag and cmd/lemonade-agent as a user
// runs them, against the default models of a real server.
func TestExampleApps(t *testing.T) {
	s := startServer(t, freePort(t), t.TempDir())
	run := func(example string) []string {
		out, err := exec.Command("go", "run", "../cmd/"+example, "-address", s.address).Output()
		if err != nil {
			t.Fatalf("%s: %v", example, err)
		}
		return strings.Split(strings.TrimSpace(string(out)), "\n")
	}
	rag := run("lemonade-rag")
	if len(rag) != 3 || rag[1] != "context:  Paris is the capital of France." || !strings.Contains(rag[2], "Paris") {
		t.Errorf("rag printed %q", rag)
	}
	agent := run("lemonade-agent")
	// The answer's words are the model's own (not the same under every load): that it answers is the app's part.
	if len(agent) != 4 || agent[1] != `tool call (json-schema): get_weather({"city":"Lisbon"})` ||
		agent[2] != "tool result: 22 °C and sunny" || !regexp.MustCompile(`^answer: \S`).MatchString(agent[3]) {
		t.Errorf("agent printed %q", agent)
	}
}
