// OHIF's MONAI Label mode in Debian's Chromium, as an annotator uses it:
// open the study, connect the panel to the server, pick "spleen", click on the image, Run with the
// 2D task, then with the 3D task. Prints one JSON line per task (HTTP status, the returned label's
// non-empty slices) and saves screenshots of the viewports before and after each run.
//
//   node ohif_point_prompts.mjs SERVER_URL STUDY_UID OUT_DIR
import { mkdirSync } from 'node:fs';
import { launchChromium } from './chromium.mjs';

const [server, study, out] = process.argv.slice(2);
mkdirSync(out, { recursive: true });

const browser = await launchChromium();
try {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  // the panel reads its server from this cookie (default: port 8000 of the page's host)
  await context.addCookies([{ name: 'MONAILABEL_SERVER_URL', value: `${server}/`, url: server }]);
  const page = await context.newPage();
  await page.goto(`${server}/ohif/monai-label?StudyInstanceUIDs=${study}`, { waitUntil: 'domcontentloaded' });
  await page.waitForSelector('table.settingsTable button', { timeout: 120000 });
  await page.waitForSelector('.cornerstone-canvas', { timeout: 120000 });
  await page.waitForTimeout(3000); // let the three MPR viewports render
  await page.click('text=Confirm and Hide', { timeout: 3000 }).catch(() => {});
  await page.click('table.settingsTable button'); // connect
  await page.waitForSelector('text=Point Prompts', { timeout: 60000 });
  await page.click('text=Point Prompts');
  const canvases = page.locator('.cornerstone-canvas');
  for (const task of ['medsam_2d', 'medsam_3d']) {
    // choosing a model clears the points, so: model, then anatomy, then the click
    await page.locator('select.selectBox').filter({ has: page.locator(`option[value="${task}"]`) }).selectOption(task);
    await page.click('tr.clickable-row:has-text("spleen")');
    await page.waitForTimeout(500);
    const axial = await canvases.nth(0).boundingBox();
    await page.mouse.click(axial.x + axial.width * 0.5, axial.y + axial.height * 0.55); // inside the spleen
    await page.waitForTimeout(1000);
    for (let v = 0; v < 3; v++) await canvases.nth(v).screenshot({ path: `${out}/${task}_before_${v}.png` });
    const [response] = await Promise.all([
      page.waitForResponse((r) => r.url().includes(`/infer/${task}`), { timeout: 300000 }),
      page.click('button[title="Run PointPrompts"]'),
    ]);
    const body = await response.body();
    const request = response.request().postData() || '';
    await page.waitForTimeout(3000); // the overlay is drawn after the label is copied into OHIF's labelmap
    for (let v = 0; v < 3; v++) await canvases.nth(v).screenshot({ path: `${out}/${task}_after_${v}.png` });
    await page.screenshot({ path: `${out}/${task}_page.png` });
    console.log(JSON.stringify({ task, status: response.status(), url: response.url(), request: request.slice(0, 2000), ...labelSummary(body) }));
  }
} finally {
  await browser.close();
}

// sizes and the non-empty slices of a raw NRRD label (what OHIF asks for: result_compress false)
function labelSummary(buffer) {
  const end = buffer.indexOf('\n\n');
  const header = buffer.subarray(0, end).toString('latin1');
  const sizes = (header.match(/^sizes: (.*)$/m) || ['', ''])[1].trim().split(/\s+/).map(Number);
  const data = buffer.subarray(end + 2);
  const plane = sizes[0] * sizes[1];
  const slices = new Set();
  let nonzero = 0;
  for (let i = 0; i < data.length; i++) {
    if (data[i]) { nonzero++; slices.add(Math.floor(i / plane)); }
  }
  return { encoding: (header.match(/^encoding: (.*)$/m) || ['', ''])[1], sizes, nonzero, slices: [...slices].sort((a, b) => a - b) };
}
