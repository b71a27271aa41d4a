// Parses Bicep files with the tree-sitter Bicep grammar (WASM) and fails on any syntax error,
// naming its line and column. The Bicep CLI itself is not on the registries this project can
// reach; this is the strictest Bicep checker that is.
//   node check-bicep.cjs FILE.bicep...
"use strict";
const fs = require("fs");
const path = require("path");
const { Parser, Language } = require("web-tree-sitter");

async function main() {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    console.error("usage: node check-bicep.cjs FILE.bicep...");
    process.exit(2);
  }
  await Parser.init();
  const wasm = path.join(__dirname, "node_modules/tree-sitter-bicep/tree-sitter-bicep.wasm");
  const bicep = await Language.load(wasm);
  const parser = new Parser();
  parser.setLanguage(bicep);
  let failed = false;
  for (const file of files) {
    const tree = parser.parse(fs.readFileSync(file, "utf8"));
    const problems = [];
    const walk = (node) => {
      if (node.isError || node.isMissing) {
        const at = `${file}:${node.startPosition.row + 1}:${node.startPosition.column + 1}`;
        problems.push(`${at}: ${node.isMissing ? "missing " + node.type : "syntax error near " + JSON.stringify(node.text.slice(0, 60))}`);
      }
      for (const child of node.children) walk(child);
    };
    walk(tree.rootNode);
    if (problems.length) {
      failed = true;
      for (const p of problems.slice(0, 20)) console.error(p);
    } else {
      const resources = tree.rootNode.descendantsOfType("resource_declaration").length;
      console.log(`${file}: parsed, ${resources} resources, no syntax errors`);
    }
  }
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
